"""kanbanctl: the light client CLI for kanband."""
