-- Event ids: one row per id handed out (AUTO_INCREMENT, which never blocks concurrent emits);
-- the poller trims old rows. MySQL commits each DDL statement by itself: one per migration.
CREATE TABLE txbus_event_ids (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY
) ENGINE = InnoDB
