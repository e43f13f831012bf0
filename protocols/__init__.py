"""Protocol declarations, one module per protocol (installed as ``securegmi.protocols``).

Each registers its `build` under the entry-point group `securegmi.protocols` (pyproject.toml);
the library finds them by name through `securegmi.protocol.registry`, never by importing them.
"""
