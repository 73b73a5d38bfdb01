"""The `slip` command (`slip.main`): convert, inspect, verify, train, export, eval, profile, demo."""
