//! `ferry token`: bearer tokens for the principals of a configuration. The broker keeps only
//! their hashes, so the token is shown once, here, and the hash goes into the file.

use std::io::Read as _;
use std::process::ExitCode;

use ferry_server::auth::token;

/// What `ferry token` does.
#[derive(clap::Subcommand)]
pub enum TokenAction {
    /// Make a new random token (256 bits) and print it, then its hash for the configuration's
    /// `tokens = [...]`. Give the token to the client (FERRY_TOKEN); keep only the hash.
    New,
    /// Print the hash of a token read from standard input (one line), for `tokens = [...]`.
    Hash,
}

/// Runs `action`; exit status 0 when done, 2 when the token could not be made or read.
pub fn run(action: TokenAction) -> ExitCode {
    let outcome = match action {
        TokenAction::New => token::generate().map(|token| {
            println!("token: {token}");
            println!("hash:  {}", token::hash(&token));
        }),
        TokenAction::Hash => read_token().map(|token| println!("{}", token::hash(&token))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(2)
        }
    }
}

/// The token on standard input: read there, not from the command line, which other users of
/// the machine can see and shells keep in their history.
fn read_token() -> Result<String, String> {
    let mut input = String::new();
    std::io::stdin()
        .take(64 << 10)
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the token from standard input: {e}"))?;
    let token = input.lines().next().unwrap_or("").trim();
    if token.chars().count() < token::MIN_TOKEN_LEN {
        return Err(format!(
            "the token on standard input is {} characters long; a token must have at least {} \
             (random ones: `ferry token new` makes one)",
            token.chars().count(),
            token::MIN_TOKEN_LEN
        ));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(
            "a token must be printable ASCII without spaces: it travels as gRPC metadata".into(),
        );
    }
    Ok(token.to_owned())
}
