DROP TABLE txbus_event_ids
