"""Run plumbing every stage may use: atomic files, checkpoint managers and metric logs, meshes and
partition rules, typed configs, tree helpers, input fingerprints. Nothing here knows a stage."""
