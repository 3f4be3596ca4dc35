"""Storage: the only code that sends Redis commands.

``keys`` (key names and name rules), ``scripts`` (loading the Lua files), ``calls`` (script calls,
the sync and async runners, error mapping), ``reads`` (plain reads and writes outside the scripts:
inspection, pause flags, the node registry), ``clients`` (clients and URLs) and ``checks`` (server
checks). Nothing here imports the API, the worker or a front.
"""
