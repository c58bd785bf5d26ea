"""Driver-registry entries of the simulated instruments.

Each entry: (driver name, "module:Class", interface name, description). Every class takes
``(name, resource="", timeout_s=2.0, options=None)``; its pydantic options model is the
class attribute ``options_model``.
"""

from __future__ import annotations

_MODULE = "drivers.simlink.instruments"

ENTRIES: list[tuple[str, str, str, str]] = [
    ("sim_laser", f"{_MODULE}:SimLaser", "Laser", "simulated pulsed laser (link model)"),
    (
        "sim_intensity_modulator",
        f"{_MODULE}:SimIntensityModulator",
        "IntensityModulator",
        "simulated decoy-state intensity modulator, hidden V_pi and bias optimum",
    ),
    (
        "sim_encoder",
        f"{_MODULE}:SimEncoder",
        "Encoder",
        "simulated BB84 polarisation encoder, hidden bias optimum, drift compensation",
    ),
    (
        "sim_attenuator",
        f"{_MODULE}:SimAttenuator",
        "VariableAttenuator",
        "simulated variable attenuator with shutter (sets the mean photon number)",
    ),
    (
        "sim_power_meter",
        f"{_MODULE}:SimPowerMeter",
        "OpticalPowerMeter",
        "simulated power meter on the transmitter's monitor tap",
    ),
    (
        "sim_detector",
        f"{_MODULE}:SimDetector",
        "SinglePhotonDetector",
        "simulated gated single-photon detector (options: channel 0-3 = H, V, D, A)",
    ),
    (
        "sim_time_tagger",
        f"{_MODULE}:SimTimeTagger",
        "TimeTagger",
        "simulated time tagger on the receiver's free-running clock",
    ),
    (
        "sim_state_source",
        f"{_MODULE}:SimStateSource",
        "StateSource",
        "simulated transmitter pattern memory (counter-based secret choices)",
    ),
    (
        "sim_polarization_controller",
        f"{_MODULE}:SimPolarizationController",
        "PolarizationController",
        "simulated four-squeezer polarisation controller in front of the receiver's analysers",
    ),
]
