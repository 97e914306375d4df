"""From the scanner's multi-echo GRE phase and magnitude to a local field in ppm.

One module per stage, each with one call shape over arrays in stated units (radians, Hz, ppm, seconds,
tesla, mm), chained by :func:`qsmdip.phase.pipeline.phase_to_local_field`:

- ``inputs``: phase scaling (radians or vendor integer ranges), echo times and B0 from files and sidecars;
- ``offsets``: per-voxel phase offsets shared by all echoes (MCPC-3D-S);
- ``unwrap``: spatial and temporal unwrapping (Laplacian; quality-guided region growing);
- ``echo_fit``: magnitude-weighted fit of the unwrapped phase over TE -> total field (Hz, then ppm); voxels
  whose phase leaves the line (dephasing) are refitted from their early echoes;
- ``masking``: brain mask from the magnitude, refined by phase quality;
- ``background``: background-field removal (V-SHARP, PDF, ...) -> local field (ppm) and its mask.

Arrays are indexed [i, j, k] like the rest of the library; multi-echo arrays put the echo first:
[echo, i, j, k].
"""
