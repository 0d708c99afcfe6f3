"""Stand-ins for development and tests: the ChurnZero sandbox. Imports the core only
(see relay)."""
