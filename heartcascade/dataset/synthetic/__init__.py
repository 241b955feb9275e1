"""Synthetic hearts: parametric anatomy (:mod:`.anatomy`), CT/MR appearance (:mod:`.appearance`) and whole
cases and datasets (:mod:`.cases`, whose public names are re-exported here)."""
from heartcascade.dataset.synthetic.cases import (CHANNEL_NAMES, DIRECTIONS, MODALITIES, SIZES, Layout, SyntheticCase,
                                                  case_rng, classes_from_labels, heart_frames_from_labels,
                                                  label_map_files, make_case, make_case_from_label_array,
                                                  make_case_from_labels, make_synthetic_dataset, remap_mmwhs,
                                                  render_appearance, sample_layout, structure_ellipsoids)

__all__ = ["CHANNEL_NAMES", "DIRECTIONS", "Layout", "MODALITIES", "SIZES", "SyntheticCase", "case_rng",
           "classes_from_labels", "heart_frames_from_labels", "label_map_files", "make_case",
           "make_case_from_label_array", "make_case_from_labels", "make_synthetic_dataset", "remap_mmwhs",
           "render_appearance", "sample_layout", "structure_ellipsoids"]
