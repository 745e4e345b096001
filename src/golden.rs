//! Reading and writing the step files of `pfc step` (inputs, parameters and outputs).
