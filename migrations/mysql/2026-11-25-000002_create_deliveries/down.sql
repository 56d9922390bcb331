DROP TABLE txbus_deliveries
