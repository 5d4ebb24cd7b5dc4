"""Training one job: its protocol, configuration and key, the matched-accuracy stop, the device
it runs on, the loop itself, and the finished job's record."""
