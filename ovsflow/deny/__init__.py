"""The deny path: packets the policy pipeline denied, delivered by OpenFlow rules that match
only the configured protocols (`rules`), received as packet-ins (`source`), decoded without
I/O (`packet`) and aggregated per connection and rule (`store`)."""
