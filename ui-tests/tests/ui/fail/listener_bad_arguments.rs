#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Ping;

#[txbus::listener(retries = 3)]
async fn unknown(_ping: Ping) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(name = "a", name = "b")]
async fn duplicate(_ping: Ping) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener(name = "")]
async fn empty(_ping: Ping) -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
