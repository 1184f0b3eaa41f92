"""mdr-connector: two-way sync between Kaspersky MDR incidents and ticket systems."""
