"""The pipeline's steps as plain Python: each module is a pure function plus a thin `main` entry that DVC runs."""
