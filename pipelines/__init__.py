"""The ferpipe DAG and its compiled YAML."""
