// Grants the healer's custom role on one watched scale set (deployed into its resource group).
param scaleSetName string
param roleDefinitionId string
param principalId string

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
