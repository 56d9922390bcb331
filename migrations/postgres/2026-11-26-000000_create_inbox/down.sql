DROP TABLE txbus_inbox_messages;
DROP TABLE txbus_inbox;
