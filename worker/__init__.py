"""What runs inside each run's process: bootstrap, egress client, spawner."""
