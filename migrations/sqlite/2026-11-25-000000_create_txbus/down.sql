DROP TABLE txbus_deliveries;
DROP TABLE txbus_sequence;
