//! One module per noun; this one dispatches and holds what they share:
//! finding a trigger by id or name, paging, asking before destroying.

mod events;
mod sets;
mod top;
mod triggers;
mod work_orders;

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use clap::CommandFactory as _;
use kt_proto::v1::{ListTriggersRequest, Trigger};

use crate::args::{Cli, Command, Format};
use crate::client::Api;
use crate::error::{CliError, Result};
use crate::output;

/// Page size of every list call (the API's maximum).
pub const PAGE_SIZE: i32 = 1000;

pub struct Ctx {
    pub api: Api,
    pub format: Format,
}

pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Completion { shell } = cli.command {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "kt", &mut out);
        return output::write_stdout(&String::from_utf8_lossy(&out));
    }
    let ctx = Ctx { api: Api::connect(&cli.global)?, format: output::resolve(cli.global.output) };
    match cli.command {
        Command::Triggers(cmd) => triggers::run(&ctx, cmd).await,
        Command::Sets(cmd) => sets::run(&ctx, cmd).await,
        Command::WorkOrders(cmd) => work_orders::run(&ctx, cmd).await,
        Command::Events(args) => events::run(&ctx, args).await,
        Command::Top(args) => top::run(&ctx, args).await,
        Command::Completion { .. } => unreachable!("handled above"),
    }
}

/// Every trigger, all pages.
pub async fn all_triggers(api: &Api) -> Result<Vec<Trigger>> {
    let mut triggers = Vec::new();
    let mut page_token = String::new();
    loop {
        let page =
            api.call(api.triggers().list_triggers(ListTriggersRequest { page_size: PAGE_SIZE, page_token })).await?;
        triggers.extend(page.triggers);
        if page.next_page_token.is_empty() {
            return Ok(triggers);
        }
        page_token = page.next_page_token;
    }
}

/// A trigger id from an id or a name.
pub async fn trigger_id(api: &Api, reference: &str) -> Result<String> {
    let reference = reference.trim();
    if uuid::Uuid::parse_str(reference).is_ok() {
        return Ok(reference.to_owned());
    }
    let found: Vec<Trigger> = all_triggers(api).await?.into_iter().filter(|t| t.name == reference).collect();
    match found.as_slice() {
        [t] => Ok(t.id.clone()),
        [] => Err(CliError::NotFound(format!("no trigger has the id or name `{reference}`"))),
        _ => Err(CliError::usage(format!("several triggers are named `{reference}`; use an id"))),
    }
}

/// Asks `question` on a terminal; without one, `--yes` is required.
pub fn confirm(question: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(format!("{question} Refusing without --yes (standard input is not a terminal)")));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).map_err(anyhow::Error::from)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(CliError::Other(anyhow::anyhow!("cancelled")))
    }
}
