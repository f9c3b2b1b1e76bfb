"""Clearance's core: pure, deterministic types, policy and the state machine.

Imports no I/O library, reads no clock and makes no ids: see docs/architecture.md.
Import from the modules themselves (`clearance.core.decide`, `.execution`,
`.events`, `.commands`, `.agent`, `.errors`, ...): this package re-exports
nothing, so importing one small module (the CLI's argument parsing needs
`json_value`) does not import the state machine.
"""
