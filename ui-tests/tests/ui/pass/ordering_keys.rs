use txbus::Event;

// A `String` key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "account.opened", ordering_key = account)]
struct AccountOpened {
    account: String,
    owner: String,
}

// Any `Display` field is a key, as its `to_string()`; the arguments may span attributes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "account.credited", version = 2, upcast(1 => |v| Ok(v)))]
#[event(ordering_key = account_id)]
struct AccountCredited {
    account_id: i64,
    cents: i64,
}

// A computed key is implemented by hand.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AccountClosed {
    tenant: String,
    account: i64,
}

impl Event for AccountClosed {
    const NAME: &'static str = "account.closed";

    fn ordering_key(&self) -> Option<String> {
        Some(format!("{}/{}", self.tenant, self.account))
    }
}

// Without the argument, there is no key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Audited {
    account_id: i64,
}

fn main() {
    let opened = AccountOpened {
        account: "acc-1".into(),
        owner: "ann".into(),
    };
    assert_eq!(opened.ordering_key().as_deref(), Some("acc-1"));
    assert_eq!(opened.owner, "ann");
    let credited = AccountCredited {
        account_id: -42,
        cents: 100,
    };
    assert_eq!(credited.ordering_key().as_deref(), Some("-42"));
    assert_eq!(
        (AccountCredited::NAME, AccountCredited::VERSION),
        ("account.credited", 2)
    );
    assert_eq!(credited.cents, 100);
    let closed = AccountClosed {
        tenant: "acme".into(),
        account: 7,
    };
    assert_eq!(closed.ordering_key().as_deref(), Some("acme/7"));
    assert_eq!(Audited { account_id: 1 }.ordering_key(), None);
}
