//! User lookups from `/etc/passwd` and `/etc/group`.
//!
//! The guest binary is static, and glibc's NSS cannot be used from a static
//! binary, so the two files are read directly.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

fn parse_passwd_line(line: &str) -> Option<(String, u32, u32, String, String)> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    Some((
        f[0].to_string(),
        f[2].parse().ok()?,
        f[3].parse().ok()?,
        f[5].to_string(),
        f[6].to_string(),
    ))
}

fn supplementary_groups(group_file: &str, name: &str) -> Vec<u32> {
    group_file
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let gid: u32 = f[2].parse().ok()?;
            f[3].split(',').any(|m| m == name).then_some(gid)
        })
        .collect()
}

/// Finds an account by name or numeric uid.
pub fn lookup_in(passwd: &str, group: &str, who: &str) -> Option<Account> {
    let by_uid: Option<u32> = who.parse().ok();
    passwd
        .lines()
        .filter_map(parse_passwd_line)
        .find(|(name, uid, ..)| name == who || Some(*uid) == by_uid)
        .map(|(name, uid, gid, home, shell)| Account {
            groups: supplementary_groups(group, &name),
            name,
            uid,
            gid,
            home,
            shell,
        })
}

/// The gid of group `name` in `/etc/group`.
pub fn group_id(name: &str) -> Option<u32> {
    let group = std::fs::read_to_string(Path::new("/etc/group")).ok()?;
    group_id_in(&group, name)
}

fn group_id_in(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[0] == name)
            .then(|| f[2].parse().ok())
            .flatten()
    })
}

pub fn lookup(who: &str) -> Option<Account> {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).ok()?;
    let group = std::fs::read_to_string(Path::new("/etc/group")).unwrap_or_default();
    if let Some(a) = lookup_in(&passwd, &group, who) {
        return Some(a);
    }
    // A bare uid with no passwd entry still runs, as that uid.
    who.parse().ok().map(|uid| Account {
        name: who.to_string(),
        uid,
        gid: uid,
        home: "/".into(),
        shell: "/bin/sh".into(),
        groups: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        broken line\n\
        agent:x:1000:1000::/home/agent:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:agent\ndocker:x:990:other,agent\nagent:x:1000:\n";

    #[test]
    fn finds_by_name_and_uid_with_groups() {
        let a = lookup_in(PASSWD, GROUP, "agent").unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/agent"));
        assert_eq!(a.groups, vec![27, 990]);
        assert_eq!(lookup_in(PASSWD, GROUP, "0").unwrap().name, "root");
        assert!(lookup_in(PASSWD, GROUP, "nobody").is_none());
        assert_eq!(group_id_in(GROUP, "docker"), Some(990));
        assert_eq!(group_id_in(GROUP, "dock"), None);
    }
}
