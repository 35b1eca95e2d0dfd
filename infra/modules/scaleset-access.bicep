// Grants the healer's custom role on one watched scale set (deployed into its resource group).
param scaleSetName string
param roleDefinitionId string
param principalId string

@description('The role for the VMs of a Flexible scale set, granted on this resource group only if the scale set is Flexible.')
param flexibleVmRoleId string

resource scaleSet 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' existing = {
  name: scaleSetName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: scaleSet
  name: guid(scaleSet.id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: roleDefinitionId
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// A Flexible scale set's VMs are the group's resources: its role goes on the group, and only when
// Azure says the set is Flexible (the mode is read from the scale set itself, never configured).
// A nested module, because a condition must be known when its deployment starts.
module flexible 'flexible-access.bicep' = {
  name: 'healer-flexible-${uniqueString(scaleSet.id)}'
  params: {
    orchestrationMode: scaleSet.properties.?orchestrationMode ?? 'Uniform'
    roleDefinitionId: flexibleVmRoleId
    principalId: principalId
  }
}
