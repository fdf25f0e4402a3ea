"""CLI command implementations (imported lazily by `lowdose_toolkit.cli`)."""
