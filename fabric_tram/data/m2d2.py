"""M2D2 (Reid et al., EMNLP 2022), the paper's cross-domain language-modelling corpus.

Hub: dataset ``machelreid/m2d2`` (licence CC-BY-NC-4.0). It is a dataset *with a loading script*, which
``datasets`` 4 and later refuse to run; its data are per-domain archives ``data/<domain>.tar.gz``, each holding
``<domain>/{train,valid,test}.txt`` with one document per line. We fetch an archive with ``huggingface_hub``
(so the hub cache, ``HF_HUB_OFFLINE`` and revisions work as everywhere else), unpack it once next to our token
cache and read it as a local domain folder (``task.doc_format=lines``).

The paper's domains (Table 7) and their archive names:
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from fabric_tram.data.file_lock import file_lock

M2D2_REPO = "machelreid/m2d2"

# S2ORC split: the paper trains on Math (1.1B training tokens) and evaluates the other ten zero-shot
S2ORC = {
    "Math": "math_l1",
    "Art": "Art",
    "Astro": "astro-ph_l1",
    "CondM.": "cond-mat_l1",
    "CS": "cs_l1",
    "Econ.": "econ_l1",
    "NLin.": "nlin_l1",
    "Phil.": "Philosophy",
    "Phys.": "physics_l1",
    "QBio": "q-bio_l1",
    "Stat": "stat_l1",
}
# Wikipedia split: the paper trains on Society and social sciences (380M training tokens)
WIKI = {
    "Soc.": "Society_and_social_sciences",
    "Cult.": "Culture_and_the_arts",
    "Gen.": "General_referece",
    "Health.": "Health_and_fitness",
    "Hist.": "History_and_events",
    "Human.": "Human_activites",
    "Math.": "Mathematics_and_logic",
    "Nat.": "Natural_and_physical_sciences",
    "Phil.": "Philosophy_and_thinking",
    "Rel": "Religion_and_belief_systems",
    "Tech.": "Technology_and_applied_sciences",
}
ABBREVIATIONS = {**{v: k for k, v in S2ORC.items()}, **{v: k for k, v in WIKI.items()}}

__doc__ += "\n".join(
    f"    {split} {abbrev:<8} -> {name}"
    for split, table in (("S2ORC", S2ORC), ("Wiki ", WIKI))
    for abbrev, name in table.items()
)


def unpack_root() -> Path:
    return Path(os.environ.get("FABRIC_TRAM_CACHE", Path.home() / ".cache" / "fabric_tram")) / "m2d2"


def fetch_domain(domain: str, repo_id: str = M2D2_REPO, revision: str | None = None, root: Path | None = None) -> Path:
    """The local folder of one M2D2 domain (train/valid/test.txt), downloaded and unpacked on first use."""
    target = (root or unpack_root()) / repo_id.replace("/", "--") / domain
    if (target / ".complete").is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):  # every rank of every node sharing the folder
        if not (target / ".complete").is_file():  # the first unpacks; the others find it complete
            unpack_domain(domain, repo_id, revision, target)
    return target


def unpack_domain(domain: str, repo_id: str, revision: str | None, target: Path) -> None:
    from huggingface_hub import hf_hub_download

    try:
        archive = hf_hub_download(
            repo_id=repo_id, repo_type="dataset", filename=f"data/{domain}.tar.gz", revision=revision
        )
    except Exception as err:
        raise FileNotFoundError(
            f"M2D2 domain {domain!r}: could not get data/{domain}.tar.gz of the dataset {repo_id!r} from the hub "
            f"or its cache ({type(err).__name__}: {err}). "
            f"Check the domain name (e.g. {', '.join(list(S2ORC.values())[:3])}, ...), "
            "go online once, or point task.data_dir at a local folder of domains."
        ) from err
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of the folder, devices
    found = [p for p in tmp.rglob("train.txt")]
    if not found:
        raise FileNotFoundError(f"{archive} holds no train.txt; is it an M2D2 domain archive?")
    shutil.rmtree(target, ignore_errors=True)
    found[0].parent.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    (target / ".complete").write_text(archive)


def fetch_domains(domains: list[str], repo_id: str = M2D2_REPO, revision: str | None = None) -> Path:
    """Fetch several domains; return the folder holding one sub-folder per domain."""
    if not domains:
        raise ValueError("an M2D2 task needs task.train_domains and task.eval_domains (archive names, e.g. math_l1)")
    folders = [fetch_domain(d, repo_id, revision) for d in domains]
    return folders[0].parent
