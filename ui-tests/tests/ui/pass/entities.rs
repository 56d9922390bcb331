use diesel::prelude::*;

diesel::table! {
    users (id) {
        id -> BigInt,
        email -> Text,
    }
}

diesel::table! {
    memberships (user_id, group_id) {
        user_id -> BigInt,
        group_id -> BigInt,
        role -> Text,
    }
}

#[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = users)]
struct NewUser<'a> {
    id: i64,
    email: &'a str,
}

#[derive(Insertable, AsChangeset, Identifiable, txbus::Entity)]
#[diesel(table_name = memberships, primary_key(user_id, group_id))]
#[entity(backends(sqlite))]
struct Membership {
    user_id: i64,
    group_id: i64,
    role: String,
}

fn takes_ops(_: &[txbus::Operation<'_, txbus::Sqlite>]) {}

fn main() {
    let user = NewUser { id: 1, email: "a@example.com" };
    let membership = Membership { user_id: 1, group_id: 2, role: "admin".into() };
    takes_ops(&[txbus::persist(&user), txbus::remove(&membership)]);
}
