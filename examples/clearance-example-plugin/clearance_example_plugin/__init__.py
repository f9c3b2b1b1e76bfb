"""An example Clearance plugin: a store URL scheme (`tenant://NAME`, one SQLite database
per customer) and a broker URL scheme (`spool:///abs/dir`, approval requests and
decisions as files), registered through the `clearance.stores` and `clearance.channels`
entry points in pyproject.toml."""
