#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, txbus::Event)]
struct Paid;

#[txbus::listener(transactional)]
async fn not_a_connection(_event: Paid, _conn: &mut String) -> Result<(), txbus::ListenerError> {
    Ok(())
}

fn main() {}
