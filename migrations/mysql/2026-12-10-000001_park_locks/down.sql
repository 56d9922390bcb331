DROP TABLE txbus_key_parks
