#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Ping;

#[txbus::listener]
fn on_ping(_ping: Ping) -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
