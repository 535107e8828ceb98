//! `ferry config diff FILE`: what applying a configuration file's declarations would do on a
//! running broker (the same plan SIGHUP applies), changing nothing.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_client::{Client, ConfigAction, Error};
use serde_json::json;

use super::{Common, table};

/// `ferry config diff`.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The configuration file.
    file: PathBuf,
    #[command(flatten)]
    common: Common,
}

impl DiffArgs {
    /// Runs the command: exit 0 when everything can be applied, 1 when something would be
    /// refused (listed), 2 when the file is bad, 3 when the broker cannot be reached.
    pub fn run(self) -> ExitCode {
        // The file alone first: a bad one says so without a broker.
        if let Err(e) = ferry_server::Config::load(&self.file) {
            eprintln!("ferry: bad configuration: {e}");
            return ExitCode::from(2);
        }
        let common = self.common.clone();
        let mut refused = false;
        let code = super::run(&common, |client| self.diff(client, &mut refused));
        match refused {
            true => ExitCode::from(1),
            false => code,
        }
    }

    async fn diff(&self, client: Client, refused: &mut bool) -> Result<(), Error> {
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", self.file.display())))?;
        let name = self.file.display().to_string();
        let steps = client.diff_config(&text, &name).await?;
        *refused = steps.iter().any(|s| s.action == ConfigAction::Refuse);
        let word = |action: ConfigAction| match action {
            ConfigAction::Create => "create",
            ConfigAction::Change => "change",
            ConfigAction::Keep => "keep",
            ConfigAction::Refuse => "REFUSE",
        };
        if self.common.json {
            let steps: Vec<_> = steps
                .iter()
                .map(|s| json!({"action": word(s.action).to_lowercase(), "object": s.object, "detail": s.detail}))
                .collect();
            println!("{}", serde_json::Value::Array(steps));
            return Ok(());
        }
        let mut rows = vec![vec![
            "ACTION".to_owned(),
            "WHAT".to_owned(),
            "DETAIL".to_owned(),
        ]];
        for step in &steps {
            rows.push(vec![
                word(step.action).to_owned(),
                step.object.clone(),
                step.detail.clone(),
            ]);
        }
        table(&rows);
        Ok(())
    }
}
