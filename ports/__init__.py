"""The interfaces the engine talks to. Adapters implement them; the core knows none of them.

Import from the modules themselves (`clearance.ports.store`, `.model`, `.tools`,
`.clock`, `.ids`, `.channel`).
"""
