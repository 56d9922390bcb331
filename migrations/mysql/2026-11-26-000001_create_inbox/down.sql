DROP TABLE txbus_inbox
