// A field that does not exist (a typo).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "account.credited", ordering_key = acount_id)]
struct Misspelt {
    account_id: i64,
    cents: i64,
}

// A string, not a field name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(ordering_key = "account_id")]
struct Quoted {
    account_id: i64,
}

// An enum has no field to name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(ordering_key = account_id)]
enum AccountEvent {
    Credited { account_id: i64 },
    Debited { account_id: i64 },
}

// Given twice.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(ordering_key = account_id, ordering_key = cents)]
struct Twice {
    account_id: i64,
    cents: i64,
}

// A field without `Display` has no `to_string()`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(ordering_key = accounts)]
struct NotDisplay {
    accounts: Vec<i64>,
}

fn main() {}
