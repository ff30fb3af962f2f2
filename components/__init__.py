"""KFP v2 lightweight components, one per file, each thin over `trainer`.

Every module holds the component's Python function (its body imports what it needs, because KFP
ships only the function's source) and a `component(image)` factory that binds the container image
at compile time, so nothing here reads the compiling machine's environment.
"""
