"""Genesis: validates and runs untrusted code (python, javascript, bash, elixir) in a bubblewrap sandbox.

`sandbox` runs one process in isolation under resource limits, `languages` knows how to syntax-check,
lint and run each language, and `runner` is the bounded concurrent pool the service calls.
"""
