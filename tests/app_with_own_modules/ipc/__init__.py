"""An application's own package named `ipc`."""

ROLE = "the application's ipc"
