"""imagesmith's sampling layer: sigma schedules and samplers as separate, composable pieces over any diffusers
denoiser (epsilon, v-prediction and flow models), matching ComfyUI's and A1111's definitions."""
