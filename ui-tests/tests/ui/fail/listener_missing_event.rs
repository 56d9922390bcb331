#[txbus::listener]
async fn on_nothing() -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
