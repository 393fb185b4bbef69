"""Data: choose a source, see its classes, its split, sample faces, unreadable files, and what the
dataset doctor finds (duplicates, leaks, conflicts...), with one click to leave those out of training."""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st

from fer_core import settings, ui_data
from fer_core.download import (CREDENTIALS_HELP, DEFAULT_DATASET, dataset_dest, download_dataset,
                               find_credentials, is_downloaded)
from fer_core.errors import FerError
from pages._shared import (DATA_SOURCE_KEY, data_home, demo_dir, literal, load_source, require_router,
                           synthetic_badge)

require_router()

SOURCES = {"demo": "Built-in demo", "local": "Local folder or fer2013.csv", "kaggle": "Kaggle download"}
SAMPLES_PER_CLASS = 8


@st.cache_data(show_spinner="Examining every image: blank, duplicate, leaked, conflicting…", max_entries=8)
def examine_source(spec: str, fingerprint: str, paths_digest: str, _dataset):
    """The dataset doctor's report on the dataset this page shows (its groups are positions in
    it, drawn beside its faces); `fingerprint` (folders, file names and times) and the shown
    dataset's own file list are the key, so a changed folder or a reloaded dataset is examined
    again, never drawn against another list's faces."""
    from fer_core.doctor import examine
    return examine(_dataset, spec)


st.title("Data")
st.caption("Pick where the faces come from. Training reads the same source, so what you see here "
           "is what the model learns from.")

initial = st.session_state.get(DATA_SOURCE_KEY, "demo")
default_kind = "demo" if initial == "demo" else "local"
kind = st.segmented_control("Source", list(SOURCES), format_func=SOURCES.get, key="data_kind",
                            default=default_kind, required=True)
spec: str | None = None

if kind == "demo":
    st.info("The built-in demo is :orange-badge[SYNTHETIC]: procedurally drawn cartoon faces, seven "
            "emotions, generated offline. It is for trying the app; scores on it say nothing about "
            "real faces.", icon=":material/science:")
    spec = "demo"

elif kind == "local":
    found = [c for c in ui_data.discover_datasets(data_home(), demo_dir()) if c.kind != "demo"]
    options = [c.spec for c in found] + ["__other__"]
    labels = {c.spec: c.label for c in found} | {"__other__": "Another path…"}
    if initial in options:
        default_index = options.index(initial)
    else:  # a path typed earlier (or chosen on another page) that is not under the data folder
        default_index = options.index("__other__") if initial != "demo" or not found else 0
    picked = st.selectbox("Dataset", options, index=default_index, format_func=labels.get,
                          key="data_local_pick",
                          help=f"Folders and fer2013.csv files found under {literal(data_home())}")
    if picked == "__other__":
        typed = st.text_input("Path to a folder or fer2013.csv", key="data_local_path",
                              value="" if initial == "demo" or initial in options else initial,
                              placeholder="/path/to/fer2013  or  /path/to/fer2013.csv",
                              help="A folder of class folders (angry/, happy/, …), a folder with "
                                   "train/ and test/ class folders, or Kaggle's fer2013.csv.")
        spec = typed.strip() or None
    else:
        spec = picked

elif kind == "kaggle":
    slug = st.text_input("Kaggle dataset", value=DEFAULT_DATASET, key="data_kaggle_slug",
                         help="owner/name as in the dataset's URL on kaggle.com").strip()
    credentials = find_credentials()
    if credentials:
        st.success(f"Kaggle credentials found: {literal(credentials)}", icon=":material/key:")
    else:
        st.warning(CREDENTIALS_HELP, icon=":material/key_off:")
    target = dataset_dest(slug) if "/" in slug else None
    already = target is not None and is_downloaded(target)
    if already:
        st.caption(f"Already downloaded to {literal(target)}.")
        spec = str(target)
    if st.button("Download", icon=":material/download:", type="primary", key="data_download",
                 disabled=already or not credentials,
                 help=None if credentials else "Set Kaggle credentials first (see above)."):
        with st.status(f"Downloading {literal(slug)} from Kaggle…", expanded=True) as status:
            try:
                folder = download_dataset(slug, log=st.text)
            except (FerError, OSError) as exc:
                status.update(label="Download failed", state="error")
                st.error(literal(exc), icon=":material/error:")
            else:
                status.update(label=f"Downloaded to {literal(folder)}", state="complete", expanded=False)
                spec = str(folder)
                load_source.clear()

if not spec:
    st.stop()

try:
    dataset = load_source(spec, str(settings.cache_dir()))
except FerError as exc:
    st.error(f"This source cannot be used: {literal(exc)}", icon=":material/error:")
    st.stop()
except OSError as exc:
    st.error(f"Could not read {literal(spec)}: {literal(exc)}", icon=":material/error:")
    st.stop()

st.session_state[DATA_SOURCE_KEY] = spec

# ---- overview --------------------------------------------------------------------------
st.divider()
head, action = st.columns([3, 1], vertical_alignment="center")
with head:
    st.subheader(literal(ui_data.dataset_label(spec, dataset.synthetic)))
    if dataset.synthetic:
        synthetic_badge()
    st.caption(f"Source: {literal(dataset.source)}")
    if dataset.renamed_classes:
        st.caption("Class names read as the usual ones: " + literal(", ".join(
            f"{folder} → {name}" for folder, name in sorted(dataset.renamed_classes.items()))))
with action:
    if st.button("Train on this dataset", icon=":material/model_training:", type="primary",
                 width="stretch", key="data_to_train"):
        st.switch_page("pages/train.py")
    if st.button("Reload from disk", icon=":material/refresh:", width="stretch", key="data_reload",
                 help="Re-read the folder (after adding or removing files)."):
        load_source.clear()
        examine_source.clear()
        st.rerun()

counts = dataset.class_counts()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Images", f"{len(dataset):,}", border=True)
m2.metric("Classes", len(dataset.classes), border=True)
m3.metric("Smallest class", f"{min(counts.values()):,}", border=True,
          help=f"{literal(min(counts, key=counts.get))}: imbalance makes rare classes harder to learn")
m4.metric("Unreadable files", len(dataset.bad_files), border=True,
          help="Files skipped because they are not images or cannot be decoded")

# ---- split -----------------------------------------------------------------------------
st.subheader("Class distribution and split")
has_given_split = dataset.given_split is not None
c1, c2, c3 = st.columns(3)
seed = c1.number_input("Seed", min_value=0, value=42, step=1, key="data_seed",
                       help="The same seed always gives the same split (training uses it too).")
val_fraction = c2.slider("Validation fraction", 0.0, 0.45, 0.10, 0.05, key="data_val_fraction",
                         help="Share of the training images held out to pick the best epoch. 0 picks "
                              "on the test split, as the reference did (optimistic).")
test_fraction = c3.slider("Test fraction", 0.05, 0.5, 0.25, 0.05, key="data_test_fraction",
                          disabled=has_given_split,
                          help="The source's own train/test split is kept when it has one."
                          if has_given_split else "Share of all images kept for the final test "
                          "(set the same value under Advanced on the Train page).")
if has_given_split:
    st.caption("This source has its own **train/test** split; it is kept as given and validation "
               "images are carved from train.")

from fer_core.data import assign_splits, split_table  # noqa: E402  (torch-heavy, after the UI is up)

try:
    splits = assign_splits(dataset, test_fraction=test_fraction, val_fraction=val_fraction, seed=int(seed))
except FerError as exc:
    st.error(f"Cannot split this dataset: {literal(exc)}", icon=":material/error:")
    splits = None

chart_left, chart_right = st.columns(2)
chart_left.plotly_chart(ui_data.class_distribution_figure(counts), key="data_class_chart")
if splits is not None:
    table = split_table(dataset, splits)
    chart_right.plotly_chart(ui_data.split_distribution_figure(table), key="data_split_chart")
    frame = ui_data.split_frame(table)
    st.dataframe(frame, hide_index=True, key="data_split_table",
                 column_config={"train %": st.column_config.NumberColumn(format="%.1f%%",
                                                                         help="train + val share"),
                                "test %": st.column_config.NumberColumn(format="%.1f%%")})
    parts = {p: int((splits == p).sum()) for p in ("train", "val", "test")}
    st.caption(f"Total: {len(dataset):,} images = {parts['train']:,} train + {parts['val']:,} "
               f"validation + {parts['test']:,} test. Stratified: every class keeps its share in "
               "every split.")

# ---- samples ---------------------------------------------------------------------------
st.subheader("Sample faces per class")
st.caption("Shown as FER2013 stores them, 48×48 grey, enlarged. Training can keep more: the Train "
           "page's Stored face size and Colour (e.g. 96 px RGB for a colour dataset).")
rng = np.random.default_rng(int(seed))
labels = dataset.labels.numpy()
for index, name in enumerate(dataset.classes):
    members = np.flatnonzero(labels == index)
    chosen = rng.choice(members, size=min(SAMPLES_PER_CLASS, len(members)), replace=False)
    label_col, images_col = st.columns([1, 7], vertical_alignment="center")
    label_col.markdown(f"**{literal(name)}**  \n{len(members):,} images")
    images_col.image([dataset.images[i].numpy() for i in sorted(chosen)], width=72)

# ---- bad files -------------------------------------------------------------------------
st.subheader("Unreadable files")
if dataset.bad_files:
    st.warning(f"{len(dataset.bad_files)} file(s) were skipped. Training ignores them too.",
               icon=":material/warning:")
    st.dataframe(dataset.bad_files, hide_index=True, key="data_bad_files",
                 column_config={"path": st.column_config.TextColumn("file", width="large"),
                                "reason": st.column_config.TextColumn("why it was skipped")})
else:
    st.success("Every file was readable.", icon=":material/check_circle:")

# ---- dataset doctor --------------------------------------------------------------------
from fer_core import doctor  # noqa: E402  (after the UI is up, as above)

DOCTOR_FOR_KEY = "data_doctor_for"  # the source the doctor's report is shown for
GROUPS_SHOWN = 4
# Files shown of one group: on a large dataset a single group can hold 100,000s of look-alike
# images (all of them are in the exclusion list and in `fer doctor DATA --json`).
FILES_SHOWN = 12
THUMBNAIL_PX = 96  # the 48x48 faces, doubled


def draw_group(group: doctor.Group) -> None:
    """One finding: its first faces enlarged, then each of those files as plain text with what
    happens to it, and how many more the group holds."""
    if group.indices:
        st.image([dataset.images[i].numpy() for i in group.indices[:FILES_SHOWN]], width=THUMBNAIL_PX)
    dropped = set(group.dropped)
    lines = []
    for n, path in enumerate(group.paths[:FILES_SHOWN]):
        where = ", ".join(x for x in (group.labels[n] if group.labels else "", group.splits[n] if group.splits
                                      else "") if x)
        fate = "left out" if path in dropped else "kept"
        lines.append(f"{fate:8}  {path}" + (f"  ({where})" if where else ""))
    if len(group.paths) > FILES_SHOWN:
        lines.append(f"…and {len(group.paths) - FILES_SHOWN:,} more files in this group "
                     f"({len(dropped):,} of the group's files left out)")
    if group.detail:
        lines.append(f"          {group.detail}")
    st.text("\n".join(lines))


def draw_report(report: doctor.DoctorReport) -> None:
    counts = report.counts()
    columns = st.columns(4) + st.columns(3)
    for column, kind in zip(columns, doctor.KINDS):
        value = f"{report.imbalance_ratio:.1f}:1" if kind == "imbalance" and report.imbalance_ratio else \
            f"{counts[kind]['groups']:,}"
        column.metric(doctor.KIND_TITLES[kind], value, border=True,
                      help=f"{doctor.KIND_RULES[kind].capitalize()}. Exclusion list: {doctor.EXCLUSION_RULES[kind]}.")
    if report.imbalance:
        st.warning(f"Class imbalance: {literal(report.imbalance)}.", icon=":material/balance:")
    for kind in doctor.KINDS[:-1]:
        groups = report.findings[kind]
        if not groups:
            continue
        found = (f"{len(groups):,} file(s)" if kind in ("unreadable", "blank") else
                 f"{len(groups):,} group(s), {counts[kind]['images']:,} images")
        label = f"{doctor.KIND_TITLES[kind]}: {found}, {counts[kind]['left_out']:,} to leave out"
        with st.expander(label):
            st.caption(f"{doctor.KIND_RULES[kind].capitalize()}. The exclusion list: {doctor.EXCLUSION_RULES[kind]}.")
            for group in groups[:GROUPS_SHOWN]:
                draw_group(group)
            if len(groups) > GROUPS_SHOWN:
                st.caption(f"…and {len(groups) - GROUPS_SHOWN:,} more (all of them are in the exclusion list "
                           "and in `fer doctor DATA --json`).")
    excluded = report.excluded()
    st.caption(f"Examined {report.num_images:,} images in {sum(report.seconds.values()):.1f} s.")
    if not excluded:
        st.success("Nothing to leave out.", icon=":material/check_circle:")
        return
    if st.button(f"Leave these out of training ({len(excluded):,} files)", icon=":material/playlist_remove:",
                 type="primary", key="data_doctor_exclude",
                 help="Writes an exclusion list into the cache folder (your files are not touched); the "
                      "Train page uses it for this dataset, and each run keeps a copy."):
        try:
            path = doctor.write_exclusions(report)
        except OSError as exc:
            st.error(f"The exclusion list could not be written: {literal(exc)}", icon=":material/error:")
        else:
            st.toast(f"Exclusion list written: {literal(path.name)}", icon=":material/check_circle:")


def draw_exclusions() -> None:
    """The dataset's exclusion list, if one was written: how many images it leaves out, and the
    split before and after."""
    path = doctor.exclusion_file(spec)
    if not path.is_file():
        return
    try:
        excluded = doctor.excluded_mask(dataset, spec, doctor.read_exclusions(path))
        after = assign_splits(dataset, test_fraction=test_fraction, val_fraction=val_fraction, seed=int(seed),
                              excluded=excluded)
    except FerError as exc:
        st.warning(f"The exclusion list for this dataset cannot be used: {literal(exc)}", icon=":material/warning:")
        return
    st.info(f"{int(excluded.sum()):,} images of this dataset are left out of training by the dataset doctor's "
            "exclusion list; the Train page uses it by default.", icon=":material/healing:")
    st.caption(f"List: {literal(path)}")
    if splits is not None:
        before_column, after_column = st.columns(2)
        before_column.markdown("**Split before**")
        before_column.dataframe(ui_data.split_frame(split_table(dataset, splits)), hide_index=True,
                                key="data_doctor_split_before")
        after_column.markdown("**Split after leaving them out**")
        after_table = split_table(dataset, after)
        after_column.dataframe(ui_data.split_frame(after_table).assign(
            excluded=[row.get("excluded", 0) for row in after_table]), hide_index=True, key="data_doctor_split_after")
    if st.button("Use every image again", icon=":material/restore:", key="data_doctor_forget",
                 help="Deletes the exclusion list (only the list; your files were never touched)."):
        try:
            doctor.remove_exclusions(spec)
        except OSError as exc:
            st.error(f"The exclusion list could not be deleted: {literal(exc)}", icon=":material/error:")
        else:
            st.rerun()


st.subheader("Dataset doctor")
st.caption(f"Looks at every decoded image for problems a model would inherit: unreadable files; blank or "
           f"near-constant images (pixel standard deviation below {doctor.BLANK_STD:g} of 255); exact duplicates "
           f"(the same pixels) and near duplicates (perceptual hashes at most {doctor.NEAR_THRESHOLD} bits of 64 "
           "apart); the same image in train and test; the same image under two labels; class imbalance. "
           "Your files are never changed.")
if st.button("Examine this dataset", icon=":material/health_and_safety:", key="data_doctor_run"):
    st.session_state[DOCTOR_FOR_KEY] = spec
if st.session_state.get(DOCTOR_FOR_KEY) == spec:
    try:
        shown = hashlib.sha256("\n".join(dataset.paths).encode("utf-8", "surrogateescape")).hexdigest()
        draw_report(examine_source(spec, doctor.dataset_fingerprint(spec), shown, dataset))
    except FerError as exc:
        st.error(f"The doctor could not examine this source: {literal(exc)}", icon=":material/error:")
draw_exclusions()
