-- A keyed delivery that a claim found waiting behind an earlier one of its key is parked: its
-- available_at moves out of the due range (for a while), so that claims do not look at it again
-- and again; the claim of its key's head takes it as due when the one before it finishes.
ALTER TABLE txbus_deliveries ADD COLUMN parked BOOLEAN NOT NULL DEFAULT FALSE
