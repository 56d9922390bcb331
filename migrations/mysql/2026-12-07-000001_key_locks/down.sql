DROP TABLE txbus_key_locks
