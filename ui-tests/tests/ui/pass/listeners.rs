use txbus::{Context, ListenerError};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
#[event(name = "user.created")]
struct UserCreated {
    email: String,
}

#[txbus::listener]
async fn with_context(event: UserCreated, ctx: Context) -> Result<(), ListenerError> {
    let _ = (event.email, ctx.attempt());
    Ok(())
}

#[txbus::listener(name = "audit")]
async fn with_anyhow(_event: UserCreated) -> anyhow::Result<()> {
    Ok(())
}

#[txbus::listener]
async fn with_string_error(_event: UserCreated, _ctx: txbus::Context) -> Result<(), String> {
    Err("nope".into())
}

#[txbus::listener]
async fn with_io_error(_event: UserCreated) -> Result<(), std::io::Error> {
    Ok(())
}

fn main() {
    // A listener stays an ordinary function.
    let _future = with_anyhow(UserCreated { email: String::new() });
    assert_eq!(<UserCreated as txbus::Event>::NAME, "user.created");
}
