use diesel::prelude::*;

diesel::table! {
    users (id) {
        id -> BigInt,
        email -> Text,
    }
}

#[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = users)]
#[entity(backends(oracle))]
struct User {
    id: i64,
    email: String,
}

fn main() {}
