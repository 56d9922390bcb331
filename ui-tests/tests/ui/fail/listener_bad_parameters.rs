#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Ping;

#[txbus::listener]
async fn by_reference(_ping: &Ping) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener]
async fn wrong_second(_ping: Ping, _n: u32) -> Result<(), txbus::ListenerError> {
    Ok(())
}

#[txbus::listener]
async fn no_result(_ping: Ping) {}

fn main() {}
