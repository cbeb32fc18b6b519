"""Cluster and process glue: the local supervisor behind `launch.py --role all`."""
