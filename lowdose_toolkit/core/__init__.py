"""The engine's core: the plugin manager and part registry, recipes and their validation into typed specs, type
checks, atomic and safe file I/O.
"""
