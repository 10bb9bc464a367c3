//! A minimal QMP client: greeting, capabilities, commands. Replies are bounded.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmError;

const MAX_REPLY: u64 = 1 << 20;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Qmp, VmError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| VmError::io(format!("connecting to QMP at {}", path.display()), e))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY)
            .read_line(&mut line)
            .await
            .map_err(|e| VmError::io("reading QMP", e))?;
        if n == 0 {
            return Err(VmError::Qmp("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmError::Qmp(format!("bad reply: {e}")))
    }

    /// Runs one command and returns its `return` value; events in between are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| VmError::io("writing QMP", e))?;
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(30), self.read_message())
                .await
                .map_err(|_| VmError::Qmp(format!("no reply to {command}")))??;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(VmError::Qmp(format!("{command}: {err}")));
            }
        }
    }
}
