"""What every role must agree on: messages, wire encoding, config schema, model resolution."""
